"""letKD's offline fit and the targets it defines: the teacher's visual words (k-means of its penultimate features)
and sub-class decisions (LDA, per-class k-means, the decision matrix), fitted once per teacher run, and the per-location
targets and loss they give. Gorgun, Gurbuz, Alatan, BMVC 2023 (arXiv 2309.02843); adagorgun/letKD-framework
``distillation/algorithms/clustering/cluster_utils.py``, ``subclass_decision/subclass_utils.py``,
``distillation/architectures/miscellaneous/vector_quantization.py`` and ``valueLayer_subclass.py``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError


def location_kl(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_i KL(targets_i ‖ softmax(scores_i))`` over the ``N = B·H·W`` locations, fp32, no τ².

    ``scores``: ``B×K×H×W``; ``targets``: ``N×K`` rows in ``(b, h, w)`` order.
    """
    log_q = F.log_softmax(scores.float().permute(0, 2, 3, 1).reshape(-1, scores.shape[1]), dim=1)
    return F.kl_div(log_q, targets, reduction="batchmean")


def visual_word_targets(features: torch.Tensor, centres: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax_k(−τ‖f − ρ_k‖²)`` per row of ``features`` (``N×d``), fp32 (``vector_quantization.py``).

    ``‖f‖²`` is the same for every k, so it is left out of the softmax (exactly; and without its cancellation).
    """
    logits = torch.addmm((centres * centres).sum(1), features, centres.t(), beta=-1.0, alpha=2.0)
    return F.softmax(temperature * logits, dim=1)


def decision_targets(projected: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                     decision: torch.Tensor, k_sub: int) -> torch.Tensor:
    """Rows of ``decision`` for the nearest own-class sub-class of every location (``valueLayer_subclass.py``).

    ``projected``: ``N×c`` LDA features; ``labels``: ``N`` class ids; ``centres``: ``(classes·k_sub)×c``, class y's
    sub-classes at ``y·k_sub .. y·k_sub + k_sub − 1``; ``decision``: row-stochastic, ``(classes·k_sub)²``.
    """
    return decision[nearest_own_subclass(projected, labels, centres, k_sub)]


def nearest_own_subclass(projected: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                         k_sub: int) -> torch.Tensor:
    """Index into ``centres`` of every row's nearest own-class sub-class centre (``N·k_sub·c`` floats at once)."""
    own = centres.view(-1, k_sub, centres.shape[1])[labels]  # N × k_sub × c
    return labels * k_sub + ((projected[:, None, :] - own) ** 2).sum(2).argmin(1)


class Locations:
    """Teacher feature rows and their labels, gathered on the CPU from a stream of batches: every row, or with a
    ``cap`` a uniform random sample (without replacement) of at most ``cap`` rows.

    Sampling gives every row a random key from a seeded generator and keeps the ``cap`` largest (priority
    sampling), so the sample does not depend on how the stream is batched and memory stays ``O(cap)``.
    """

    def __init__(self, cap: int | None, generator: torch.Generator):
        self.cap, self.generator = cap, generator
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (keys, rows, labels)
        self.held = 0
        self.seen = 0
        self.threshold = -1.0

    def add(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.seen += rows.shape[0]
        rows, labels = rows.float().cpu(), labels.cpu()
        if self.cap is None:
            self.parts.append((torch.empty(0), rows, labels))
            return
        keys = torch.rand(rows.shape[0], generator=self.generator)
        keep = keys > self.threshold
        if not bool(keep.all()):
            rows, labels, keys = rows[keep], labels[keep], keys[keep]
        self.parts.append((keys, rows, labels))
        self.held += rows.shape[0]
        if self.held >= 2 * self.cap:
            self._compact()

    def _compact(self) -> None:
        keys, rows, labels = (torch.cat(t) for t in zip(*self.parts))
        if keys.shape[0] > self.cap:
            keys, order = keys.topk(self.cap)
            rows, labels = rows[order], labels[order]
            self.threshold = float(keys.min())
        self.parts = [(keys, rows, labels)]
        self.held = keys.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, labels)``: ``n×d`` fp32 and ``n`` class ids, on the CPU."""
        if not self.parts:
            raise KdbenchError("letkd: the fit pass yielded no training batches")
        if self.cap is not None:
            self._compact()
            _, rows, labels = self.parts.pop()
            return rows, labels
        # Every row: copied into one tensor part by part, each part freed once copied, so the peak is about one
        # copy of the features (≈3.3 GB for CIFAR-100 at 8x8 with d = 256), not two.
        n, (_, first, _) = sum(r.shape[0] for _, r, _ in self.parts), self.parts[0]
        rows, labels = torch.empty(n, first.shape[1]), torch.empty(n, dtype=torch.long)
        i = 0
        while self.parts:
            _, part, part_labels = self.parts.pop(0)
            rows[i:i + part.shape[0]], labels[i:i + part.shape[0]] = part, part_labels
            i += part.shape[0]
        return rows, labels


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean) for every row of ``x``, in chunks."""
    sq = (centres * centres).sum(1)
    return torch.cat([torch.addmm(sq, x[i:i + chunk], centres.t(), alpha=-2.0).argmin(1)
                      for i in range(0, x.shape[0], chunk)])


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """``k`` k-means centres (``k×d`` fp32, on ``x``'s device) of every row of ``x``, by faiss on the CPU.

    As the reference's ``cluster_utils.run_kmeans`` (``faiss.Clustering``, ``niter = 20``): faiss's default random
    initial centres (``k`` distinct rows drawn with ``seed``), ``iters`` Lloyd rounds, faiss's split of empty
    clusters. ``max_points_per_centroid`` is raised to ``⌈n/k⌉`` because faiss's default (256) would silently
    cluster a subsample of ``256·k`` rows (the reference sets 10⁷); ``min_points_per_centroid = 1`` only silences
    faiss's warning on small samples. Fails with a one-line message when there are fewer rows than centres.
    """
    import faiss

    n = x.shape[0]
    if n < k:
        raise KdbenchError(f"letkd: k-means with {k} centres needs at least {k} feature locations, but the fit "
                           f"has {n}; use more training images, a larger fit_points cap in the recipe, or fewer "
                           "centres (letkdN.k_penult / letkd2.k_sub)")
    data = x.detach().float().cpu().contiguous().numpy()
    fitted = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=-(-n // k),
                          min_points_per_centroid=1, verbose=False)
    fitted.train(data)
    return torch.from_numpy(fitted.centroids.copy()).to(x.device)


def fit_lda(x: torch.Tensor, labels: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sklearn`` LDA (svd solver) as a fixed affine map ``z = W f + b`` with ``W = scalingsᵀ``, ``b = −W·x̄``
    (letKD ``LDA_Layer``), first ``components`` directions. Directions beyond the sample's rank are zero rows."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    if int(labels.unique().numel()) < 2:
        raise KdbenchError("letkd2: the LDA fit needs locations of at least two classes; use more training images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Variables are collinear" on small samples
        lda = LinearDiscriminantAnalysis(solver="svd").fit(x.float().cpu().numpy(), labels.cpu().numpy())
    scalings = torch.from_numpy(lda.scalings_).float()[:, :components]
    weight = torch.zeros(components, x.shape[1])
    weight[:scalings.shape[1]] = scalings.t()
    bias = -weight @ torch.from_numpy(lda.xbar_).float()
    return weight.to(x.device), bias.to(x.device)


def fit_subclasses(z: torch.Tensor, labels: torch.Tensor, num_classes: int, k_sub: int, iters: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Per-class k-means (``k_sub`` sub-classes each) on LDA features ``z`` and the decision matrix ``s_T``, as
    adagorgun/letKD-framework ``distillation/algorithms/subclass_decision/subclass_utils.py``.

    Each class's centres are a faiss k-means (:func:`kmeans`, seed ``seed + class``) of all its locations.
    Every location is assigned to its nearest own-class centre; prototypes are the means of those groups; row ``k``
    of ``s_T`` is the distribution of the nearest prototype among all sub-classes over the locations of group
    ``k``. A class with fewer than ``k_sub`` locations in the sample repeats its points as centres (no locations:
    the sample mean); a group without locations gets the one-hot row on itself, so every row is a distribution.
    """
    centres = torch.zeros(num_classes * k_sub, z.shape[1], device=z.device)
    short = 0
    for c in range(num_classes):
        points = z[labels == c]
        if points.shape[0] >= k_sub:
            centres[c * k_sub:(c + 1) * k_sub] = kmeans(points, k_sub, iters, seed + c)
        else:
            short += 1
            fill = points if points.shape[0] else z.mean(0, keepdim=True)
            centres[c * k_sub:(c + 1) * k_sub] = fill[torch.arange(k_sub, device=z.device) % fill.shape[0]]
    decision_rows = torch.eye(num_classes * k_sub, device=z.device)
    chunk = 65536  # all ≈3.2 M locations at once would be N·k_sub·c floats (≈6 GB)
    group = torch.cat([nearest_own_subclass(z[i:i + chunk], labels[i:i + chunk], centres, k_sub)
                       for i in range(0, z.shape[0], chunk)])
    counts = torch.bincount(group, minlength=num_classes * k_sub)
    prototypes = torch.zeros_like(centres).index_add_(0, group, z)
    prototypes = torch.where(counts[:, None] > 0, prototypes / counts.clamp(min=1)[:, None], centres)
    nearest = _nearest(z, prototypes)
    size = num_classes * k_sub
    votes = torch.bincount(group * size + nearest, minlength=size * size).view(size, size).float()
    decision = torch.where(counts[:, None] > 0, votes / counts.clamp(min=1)[:, None], decision_rows)
    return centres, decision, {"classes_short_of_points": short, "empty_subclasses": int((counts == 0).sum())}
