"""``letkd1`` / ``letkd2``: "Knowledge Distillation Layer that Lets the Student Decide".

Gorgun, Gurbuz, Alatan, BMVC 2023 (arXiv 2309.02843) and its supplementary material; official code
adagorgun/letKD-framework: ``distillation/architectures/miscellaneous/`` (``valueLayer.py``,
``valueLayer_subclass.py``, ``vector_quantization.py``), ``distillation/algorithms/classification/``
(``classification_quest_value.py``, ``classification_subclass_quest_value.py``) and the ``CIFAR100/`` configs.

**The deployed model is "student + KD layer"** (the method's ``note``, carried by every results row): the
learnable KD layers stay inside the student at inference, so a letKD result is not the plain student
architecture that every other method reports.
The record carries ``inference_params`` / ``inference_macs`` (student with the layers) next to
``student_params`` / ``student_macs`` (the plain architecture); ``extra_params_inference`` is the layers' size.

KD layer (``valueLayer.py``), hooked onto a student tap so its output feeds the rest of the network::

    a = s1 · cos(templates, x)            cosine 1×1 conv C -> K, learnable scalar s1 (init 3.0)
    v = s2 · cos(semantic, ReLU(BN(a)))   cosine 1×1 conv K -> C, learnable scalar s2 (init 1.0)
    x̂ = x + α · v

Supervision (per spatial location, batch mean over B·H·W locations of ``KL(p_T ‖ softmax(a))``, no τ²):

- ``letkd1``: one layer on ``pre_pool`` (the map global pooling reads), K = 4096 templates; target
  ``p_T = softmax(−τ_q‖f_T − ρ_k‖²)`` over 4096 k-means centres ρ of the teacher's ``pre_pool`` features
  (``vector_quantization.py``).
- ``letkd2``: letkd1 plus a layer on ``last_stage_first_block`` with K = k_sub · num_classes templates (800 on
  CIFAR-100), supervised by the teacher's sub-class decisions: LDA of the teacher's ``last_stage_first_block``
  features (``min(60, num_classes − 1)`` components), ``k_sub = 8`` k-means sub-classes per class, the decision
  matrix ``s_T``; a location of class y takes the row of its nearest own-class sub-class
  (``valueLayer_subclass.py``).

When the teacher map is larger than the student's, it is average-pooled to the student's size before fitting and
before every target computation (the configs' teacher option ``downscale``); when it is smaller, targets are
computed at the teacher's size and repeated (nearest) onto the student's grid (no reference pair does this).

Objective: ``ce_weight·CE + kd_weight·KD_T + penult_weight·L_penult (+ inter_weight·L_inter)``. CE and
logit KD come from the base class's options (``LOGIT_OPTIONS``: ``ce_weight``, ``kd_weight``, ``temperature`` = the
logit-KD T, ``kl_reduction``; ``Method.logit_terms``); letKD's own are ``penult_weight``, ``inter_weight`` and
``assign_temperature`` (τ_q of the soft assignment, config ``temperature: 1``). Presets (``presets``):

- ``official``: the letKD code, ``CE + L_penult (+ L_inter)`` (``cls_loss_coef = quest_loss_coef = sub_loss_coef
  = 1``); the code never uses the teacher's logits, so ``kd_weight = 0``;
- ``crd``: the same; no logit KD is already the crd convention for a feature method (HobbitLong/RepDistiller
  ``scripts/run_cifar_distill.sh``);
- ``semckd``: ``+ 1·KD_4`` (``kd_weight = 1``), the semckd rule that every method adds KD; for letKD an
  unpublished "+KD" variant, labelled so.

Residual scales ``alpha_penult`` / ``alpha_inter`` are 1 except for ResNet50 -> MobileNetV2, whose official
configs (``CIFAR100/cross_model/RN50_MNv2``, ``value_ratio``) set 0.1 / 0.2: ``pair_defaults`` applies them for
that pair under every protocol, and ``--set`` still wins.

Offline fit (``prepare``; once per teacher run, cached in ``prep.cache_dir``), as the reference's
``distillation/algorithms/clustering/cluster_utils.py`` and ``subclass_decision/subclass_utils.py``: one pass of
teacher forwards over every training image, un-augmented as in the reference (``prep.plain_batches()``), every
spatial location one point; k-means by faiss (``faiss.Kmeans``: ``kmeans_iters`` = 20
rounds as the reference's ``niter``, faiss's default random initial centres, seeded with ``fit_seed`` where the
reference draws an unseeded seed, ``max_points_per_centroid`` raised so that faiss clusters every point, as the
reference's 10⁷ does) for the ``k_penult`` visual words and for each class's ``k_sub`` sub-classes; ``sklearn``'s
LDA (svd solver). All locations are used (the reference clusters all ≈3.2 M of CIFAR-100) unless the recipe caps
them (``Preparation.fit_points``: a uniform random sample, seeded, of at most that many locations per artefact).
The cap is part of the artefact's key; each artefact's metadata (``meta``) and :meth:`LetKD.fit_metrics` give the
locations available, the points clustered and the fit time. Artefacts are written atomically, keyed by everything
that determines them, and shared by every student run of that teacher (letkd1 and letkd2 share the penultimate
fit). The run's ``prepare_s`` is the fit on the first run and only the load afterwards, when the stored fit time
counts in its end-to-end cost as ``reused_fit_s``. The fitted tensors live in the method's buffers, so a resumed
run (which skips ``prepare``) has them.

On several processes (kdbench.distributed) the offline fit (``prepare``) runs once, on rank 0, over whole batches,
and the others load its buffers from rank 0: every process trains with the fit one process makes (letKD's official
code trains on one GPU, so this is our choice). The KD layers' BatchNorms are per process unless ``--sync-bn``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods import register_method
from kdbench.methods.base import (
    AT_LEAST_ONE,
    FEATURE_PRESETS,
    LOGIT_OPTIONS,
    NON_NEGATIVE,
    POSITIVE,
    Method,
    MethodContext,
    Preparation,
    Range,
    StepOutputs,
)
from kdbench.methods.letkd_fit import (
    Locations,
    decision_targets,
    fit_lda,
    fit_subclasses,
    kmeans,
    location_kl,
    visual_word_targets,
)
from kdbench.methods.letkd_layer import ARCHITECTURE_NOTE, KDLayer, LetKDStudent, install_kd_layers
from kdbench.results import atomic_write

log = logging.getLogger(__name__)

PENULT_TAP = "pre_pool"
INTER_TAP = "last_stage_first_block"
ARTEFACT_VERSION = 3  # 2: faiss k-means on every location (or the recipe's cap); 3: an un-augmented pass


# ------------------------------------------------------------------------------------------------ the method


@dataclasses.dataclass(frozen=True)
class Site:
    """One KD layer: the tap it sits on in the student and the teacher tap that supervises it."""

    tap: str
    student_shape: tuple[int, int, int]
    teacher_shape: tuple[int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.student_shape[1], self.student_shape[2]

    @property
    def fit_size(self) -> tuple[int, int]:
        """The spatial size at which teacher features are quantised: the student's, unless the teacher's is smaller."""
        h, w = self.teacher_shape[1:]
        if (h, w) == self.size or (h >= self.size[0] and w >= self.size[1]):
            return self.size
        if h <= self.size[0] and w <= self.size[1]:
            return h, w
        raise KdbenchError(f"letkd: cannot align a teacher map of {h}x{w} with a student map of "
                           f"{self.size[0]}x{self.size[1]} at {self.tap}")

    def teacher_rows(self, teacher_map: torch.Tensor) -> torch.Tensor:
        """The teacher map, average-pooled to ``fit_size`` when larger, as ``(B·h·w)×d`` fp32 rows."""
        t = teacher_map.float()
        if tuple(t.shape[2:]) != self.fit_size:
            t = F.adaptive_avg_pool2d(t, self.fit_size)
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    def to_student_grid(self, targets: torch.Tensor, batch: int) -> torch.Tensor:
        """Targets computed on ``fit_size`` repeated (nearest) onto the student's grid when that is larger."""
        if self.fit_size == self.size:
            return targets
        k = targets.shape[1]
        grid = targets.view(batch, *self.fit_size, k).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.size, mode="nearest")
        return grid.permute(0, 2, 3, 1).reshape(-1, k)


class LetKD(Method):
    """Shared machinery of letKD-1 and letKD-2 (the deployed model is "student + KD layer")."""

    note: ClassVar[str] = ARCHITECTURE_NOTE
    family: ClassVar[str] = "layer-adding"
    use_inter: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        **LOGIT_OPTIONS,  # ce_weight, kd_weight (0: no logit KD, as published), temperature (of KD), kl_reduction
        "penult_weight": 1.0,  # quest_loss_coef
        "k_penult": 4096,  # templates of the penultimate KD layer = k-means centres (configs' num_embeddings)
        "assign_temperature": 1.0,  # τ_q of the penultimate soft assignment (config `temperature`)
        "alpha_penult": 1.0,  # residual scale (0.1 for ResNet50 -> MobileNetV2: pair_defaults)
        "fit_seed": 0,  # seed of the fit's sampling and k-means (not the run seed: one fit per teacher)
        "kmeans_iters": 20,  # faiss niter, as the reference
    }
    ranges: ClassVar[dict[str, Range]] = {
        **Method.ranges, "penult_weight": NON_NEGATIVE, "k_penult": AT_LEAST_ONE, "assign_temperature": POSITIVE,
        "alpha_penult": NON_NEGATIVE, "kmeans_iters": AT_LEAST_ONE,
        "fit_seed": Range(0, 2**30),  # faiss seeds are 32-bit ints, and letkd2 seeds fit_seed + class
    }
    # official: CE + L_penult (+ L_inter), no logit KD (the configs' *_loss_coef); crd: the same; semckd: + 1·KD_4
    # (DefangChen/SemCKD's convention).
    presets: ClassVar[dict[str, dict[str, Any]]] = {"official": {"ce_weight": 1.0, "kd_weight": 0.0},
                                                    **FEATURE_PRESETS}
    # (teacher, student) -> the residual scales of its official config (CIFAR100/cross_model/RN50_MNv2, `value_ratio`).
    PAIR_ALPHAS: ClassVar[dict[tuple[str, str], dict[str, float]]] = {
        ("ResNet50", "MobileNetV2"): {"alpha_penult": 0.1, "alpha_inter": 0.2}}

    @classmethod
    def pair_defaults(cls, teacher: str | None, student: str) -> dict[str, Any]:
        """The official config's ``α`` (``value_ratio``) for ResNet50 -> MobileNetV2; ``{}`` for every other pair."""
        return {k: v for k, v in cls.PAIR_ALPHAS.get((teacher, student), {}).items() if k in cls.defaults}

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.teacher_shapes is None:
            raise ValueError(f"{self.name} needs a teacher: MethodContext.teacher_shapes is None")
        # Options not given take their defaults (the harness always hands the resolved set).
        self.opts = {**self.defaults, **ctx.options}
        self.ctx = dataclasses.replace(ctx, options=self.opts)
        self.penult = self._site(PENULT_TAP)
        layers = {PENULT_TAP: KDLayer(self.penult.student_shape[0], self.opts["k_penult"],
                                      self.opts["alpha_penult"])}
        self.register_buffer("penult_centres", torch.zeros(self.opts["k_penult"], self.penult.teacher_shape[0]))
        taps = [PENULT_TAP]
        if self.use_inter:
            self.inter = self._site(INTER_TAP)
            d = self.inter.teacher_shape[0]
            self.k_sub = int(self.opts["k_sub"])
            self.lda_components = min(int(self.opts["lda_components"]), ctx.num_classes - 1, d)
            k_inter = self.k_sub * ctx.num_classes
            layers[INTER_TAP] = KDLayer(self.inter.student_shape[0], k_inter, self.opts["alpha_inter"])
            self.register_buffer("lda_weight", torch.zeros(self.lda_components, d))
            self.register_buffer("lda_bias", torch.zeros(self.lda_components))
            self.register_buffer("inter_centres", torch.zeros(k_inter, self.lda_components))
            self.register_buffer("decision", torch.zeros(k_inter, k_inter))
            taps.append(INTER_TAP)
        self._check_fit_size()
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.kd_layers = nn.ModuleDict(layers)
        self.student_taps = ()
        self.teacher_taps = tuple(taps)
        self._scores: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._deployed: LetKDStudent | None = None
        self.fit_meta: dict[str, dict[str, Any]] = {}
        self._reused_fit_s = 0.0

    def _check_fit_size(self) -> None:
        """Fails when the offline fit would have fewer locations than centres (the recipe's cap, or every location of
        the training images), so that the sweep stops when it is planned rather than after the teacher trained."""
        sites = {"k_penult": (self.penult, int(self.opts["k_penult"]))}
        if self.use_inter:
            sites["k_sub"] = (self.inter, self.k_sub * self.ctx.num_classes)
        for option, (site, centres) in sites.items():
            h, w = site.fit_size
            points = [n for n in (self.ctx.fit_points, self.ctx.num_train * h * w if self.ctx.num_train else None)
                      if n is not None]
            if points and min(points) < centres:
                raise KdbenchError(f"{self.name}: the fit at {site.tap} would cluster {min(points)} feature locations "
                                   f"into {centres} centres; use more training images, a larger fit_points cap in "
                                   f"the recipe, or a smaller {self.name}.{option}")

    def _site(self, tap: str) -> Site:
        for side, shapes in (("student", self.ctx.student_shapes), ("teacher", self.ctx.teacher_shapes)):
            if tap not in shapes or len(shapes[tap]) != 3:
                raise KdbenchError(f"{self.name}: the {side} model has no {tap!r} feature map (a zoo model tap)")
        return Site(tap, tuple(self.ctx.student_shapes[tap]), tuple(self.ctx.teacher_shapes[tap]))

    # ---------------------------------------------------------------------------------------- student side

    def attach(self, student: nn.Module) -> None:
        self._handles = install_kd_layers(student, self.kd_layers, self._scores)

    def extra_params_inference(self) -> int:
        return sum(p.numel() for p in self.kd_layers.parameters())

    def export(self, student: nn.Module) -> nn.Module:
        """The student with its KD layers (a :class:`LetKDStudent`); the training hooks hand over to it."""
        if self._deployed is None or self._deployed.student is not student:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            # Not a submodule of the method: the student's parameters must not count as (or train as) the method's.
            object.__setattr__(self, "_deployed", LetKDStudent(student, self.kd_layers))
        return self._deployed

    # ---------------------------------------------------------------------------------------- loss

    def losses(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        if not bool(self.fitted):
            raise RuntimeError(f"{self.name}: the teacher artefacts are not fitted (prepare() has not run)")
        missing = [t for t in self.teacher_taps if t not in self._scores]
        if missing:
            raise RuntimeError(f"{self.name}: no KD-layer scores from the student's forward at {missing} "
                               "(attach() not called, or the student ran in eval mode)")
        scores = {tap: self._scores.pop(tap) for tap in self.teacher_taps}
        terms = self.logit_terms(out)  # ce_weight·CE, and kd_weight·KD_T when kd_weight > 0
        batch = out.labels.shape[0]
        with torch.autocast(out.labels.device.type, enabled=False):
            if self.opts["penult_weight"]:  # a zero weight leaves the term out, as logit_terms does
                targets = self.penult_targets(out.teacher_features[PENULT_TAP], batch)
                terms["penult"] = self.opts["penult_weight"] * location_kl(scores[PENULT_TAP], targets)
            if self.use_inter and self.opts["inter_weight"]:
                targets = self.inter_targets(out.teacher_features[INTER_TAP], out.labels)
                terms["inter"] = self.opts["inter_weight"] * location_kl(scores[INTER_TAP], targets)
        return terms

    def penult_targets(self, teacher_map: torch.Tensor, batch: int) -> torch.Tensor:
        """``N×K`` soft visual-word assignments of the teacher's penultimate map, on the student's grid."""
        rows = self.penult.teacher_rows(teacher_map)
        targets = visual_word_targets(rows, self.penult_centres, self.opts["assign_temperature"])
        return self.penult.to_student_grid(targets, batch)

    def inter_targets(self, teacher_map: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``N×K_inter`` sub-class decision rows for the teacher's intermediate map, on the student's grid."""
        rows = self.inter.teacher_rows(teacher_map)
        h, w = self.inter.fit_size
        projected = torch.addmm(self.lda_bias, rows, self.lda_weight.t())
        targets = decision_targets(projected, labels.repeat_interleave(h * w), self.inter_centres, self.decision,
                                   self.k_sub)
        return self.inter.to_student_grid(targets, labels.shape[0])

    # ---------------------------------------------------------------------------------------- offline fit

    def artefact_keys(self, fit_points: int | None = None) -> dict[str, dict[str, Any]]:
        """What determines each fitted artefact, the recipe's cap ``fit_points`` included; its hash names the file."""
        common = {"version": ARTEFACT_VERSION, "fit_points": fit_points, "fit_seed": int(self.opts["fit_seed"]),
                  "kmeans": "faiss", "kmeans_iters": int(self.opts["kmeans_iters"])}
        keys = {"penult": {"kind": "penult", "tap": PENULT_TAP, "teacher_shape": list(self.penult.teacher_shape),
                           "fit_size": list(self.penult.fit_size), "k": int(self.opts["k_penult"]), **common}}
        if self.use_inter:
            keys["inter"] = {"kind": "inter", "tap": INTER_TAP, "teacher_shape": list(self.inter.teacher_shape),
                             "fit_size": list(self.inter.fit_size), "k_sub": self.k_sub,
                             "num_classes": int(self.ctx.num_classes), "lda_components": self.lda_components,
                             **common}
        return keys

    @staticmethod
    def artefact_path(cache_dir: Path, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return Path(cache_dir) / f"letkd-{key['kind']}-{digest}.pt"

    def prepare(self, prep: Preparation) -> None:
        keys = self.artefact_keys(prep.fit_points)
        artefacts: dict[str, dict[str, Any]] = {}
        for kind, key in keys.items():
            path = self.artefact_path(prep.cache_dir, key)
            if path.exists():
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if stored.get("key") == key:
                    artefacts[kind] = stored
                    log.info("letkd: reusing %s", path)
        missing = [kind for kind in keys if kind not in artefacts]
        if missing:
            for kind, fitted in self._fit(prep, {kind: keys[kind] for kind in missing}).items():
                path = self.artefact_path(prep.cache_dir, keys[kind])
                atomic_write(path, lambda p: torch.save(fitted, p))
                artefacts[kind] = fitted
                log.info("letkd: fitted %s in %.1f s", path, fitted["meta"]["fit_s"])
        with torch.no_grad():
            self.penult_centres.copy_(artefacts["penult"]["centres"])
            if self.use_inter:
                inter = artefacts["inter"]
                for name in ("lda_weight", "lda_bias", "inter_centres", "decision"):
                    getattr(self, name).copy_(inter[name])
            self.fitted.fill_(True)
        self.fit_meta = {kind: dict(a["meta"]) for kind, a in artefacts.items()}
        self._reused_fit_s = sum(float(self.fit_meta[kind]["fit_s"]) for kind in keys if kind not in missing)

    def reused_fit_s(self) -> float:
        return self._reused_fit_s

    def fit_metrics(self) -> dict[str, float]:
        """Per artefact (``penult``, ``inter``): ``fit_locations_*`` teacher feature locations the pass saw,
        ``fit_points_*`` those clustered (fewer only under the recipe's cap), ``fit_s_*`` the fit's seconds (its
        share of the extraction pass plus LDA and k-means), also when the artefact was loaded from the cache."""
        metrics: dict[str, float] = {}
        for kind, meta in self.fit_meta.items():
            metrics[f"fit_locations_{kind}"] = int(meta["locations"])
            metrics[f"fit_points_{kind}"] = int(meta["points"])
            metrics[f"fit_s_{kind}"] = float(meta["fit_s"])
        return metrics

    @torch.no_grad()
    def _fit(self, prep: Preparation, keys: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """One pass of teacher forwards gathers the locations of each artefact (all, or the recipe's capped
        sample); then faiss k-means (and for ``inter`` LDA, per-class k-means and the decision matrix)."""
        started = time.perf_counter()
        seed, iters = int(self.opts["fit_seed"]), int(self.opts["kmeans_iters"])
        sites = {"penult": self.penult, **({"inter": self.inter} if self.use_inter else {})}
        # A fixed stream per artefact, so an artefact does not depend on whether the other one was cached.
        streams = {"penult": seed, "inter": seed + 1}
        stores = {kind: Locations(prep.fit_points, torch.Generator().manual_seed(streams[kind])) for kind in keys}
        for x, y in prep.plain_batches():
            _, features = prep.teacher(x)
            for kind, store in stores.items():
                site = sites[kind]
                h, w = site.fit_size
                store.add(site.teacher_rows(features[site.tap]), y.repeat_interleave(h * w))
        # The pass is shared by the artefacts it feeds: each carries its share, so reused fits add up to the cost.
        extract_s = (time.perf_counter() - started) / len(stores)
        fitted = {}
        for kind, store in stores.items():
            t0 = time.perf_counter()
            rows, labels = store.result()
            key = keys[kind]
            meta: dict[str, Any] = {"locations": int(store.seen), "points": int(rows.shape[0]),
                                    "fit_points_cap": prep.fit_points, "extract_s": extract_s}
            if kind == "penult":
                tensors = {"centres": kmeans(rows, key["k"], iters, seed)}
            else:
                weight, bias = fit_lda(rows, labels, key["lda_components"])
                z = torch.addmm(bias, rows, weight.t())
                del rows
                centres, decision, info = fit_subclasses(z, labels, key["num_classes"], key["k_sub"], iters, seed)
                tensors = {"lda_weight": weight, "lda_bias": bias, "inter_centres": centres, "decision": decision}
                meta.update(info)
            meta["cluster_s"] = time.perf_counter() - t0
            meta["fit_s"] = extract_s + meta["cluster_s"]
            fitted[kind] = {"key": key, "meta": meta, **{name: t.cpu() for name, t in tensors.items()}}
        return fitted


@register_method
class LetKD1(LetKD):
    """letKD-1: one KD layer (K = 4096) before global pooling; deployed as "student + KD layer" (Gorgun et al.,
    BMVC 2023)."""

    name = "letkd1"


@register_method
class LetKD2(LetKD):
    """letKD-2: letKD-1 plus a KD layer (K = 8 · classes) after the first block of the last stage, supervised by
    the teacher's LDA sub-class decisions; deployed as "student + KD layer" (Gorgun et al., BMVC 2023)."""

    name = "letkd2"
    use_inter = True
    defaults = {
        **LetKD.defaults,
        "k_sub": 8,  # sub-classes per class: K_inter = k_sub · num_classes (800 on CIFAR-100)
        "lda_components": 60,  # capped at num_classes − 1 and the teacher's channels
        "alpha_inter": 1.0,  # 0.2 for ResNet50 -> MobileNetV2: pair_defaults
        "inter_weight": 1.0,  # sub_loss_coef
    }
    ranges = {**LetKD.ranges, "k_sub": AT_LEAST_ONE, "lda_components": AT_LEAST_ONE, "alpha_inter": NON_NEGATIVE,
              "inter_weight": NON_NEGATIVE}
