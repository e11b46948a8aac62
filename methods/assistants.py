"""Teacher-assistant chains for TAKD and DGKD: defaults per pair, and validation.

A chain is ``(teacher, A1, ..., An, student)``, largest first. The defaults are kdbench's choice: the
reference pairs use the chains in ``DEFAULT_CHAINS``; for wrn_40_2 -> wrn_16_2 it is the chain that the DGKD
paper's teacher + TA parameter count implies (Son et al., ICCV 2021, arXiv 2009.08825: 6.69 M = wrn_40_2 +
wrn_34_2 + wrn_28_2 + wrn_22_2). Other pairs of one family get every registered depth in between.
Cross-family pairs need ``--ta-chain``.
"""

from __future__ import annotations

import functools
import re

import torch

from kdbench.errors import KdbenchError
from kdbench.models import create_model, list_models

DEFAULT_CHAINS = {
    ("wrn_40_2", "wrn_16_2"): ("wrn_34_2", "wrn_28_2", "wrn_22_2"),
    ("resnet56", "resnet20"): ("resnet44", "resnet32"),
    ("resnet110", "resnet20"): ("resnet56", "resnet44", "resnet32"),
    ("resnet110", "resnet32"): ("resnet56", "resnet44"),
    ("resnet32x4", "resnet8x4"): ("resnet20x4", "resnet14x4"),
    ("vgg13", "vgg8"): ("vgg11",),
}
# Families whose members differ only in depth: name -> (family, depth).
_FAMILIES = {"resnet": re.compile(r"resnet(?P<depth>\d+)(?P<width>x4)?"),
             "wrn": re.compile(r"wrn_(?P<depth>\d+)_(?P<width>\d+)"),
             "vgg": re.compile(r"vgg(?P<depth>\d+)(?P<width>)")}


def _family_depth(name: str) -> tuple[str, int] | None:
    """(family and width, depth) for models that differ only in depth, e.g. resnet32x4 -> ("resnetx4", 32)."""
    for family, pattern in _FAMILIES.items():
        if match := pattern.fullmatch(name):
            return family + (match["width"] or ""), int(match["depth"])
    return None


@functools.lru_cache(maxsize=None)
def parameter_count(name: str) -> int:
    """Parameters of a zoo model at 100 classes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name).parameters())


def default_chain(teacher: str, student: str) -> tuple[str, ...]:
    """The full default chain ``(teacher, TAs..., student)``; a KdbenchError when there is none."""
    if (teacher, student) in DEFAULT_CHAINS:
        return (teacher, *DEFAULT_CHAINS[teacher, student], student)
    t, s = _family_depth(teacher), _family_depth(student)
    if t is None or s is None or t[0] != s[0] or t[1] <= s[1]:
        raise KdbenchError(f"no default teacher-assistant chain for {teacher}:{student}; give one with "
                           f"--ta-chain {teacher}:TA1:...:{student}")
    between = sorted(((fd[1], name) for name in list_models() if (fd := _family_depth(name)) and fd[0] == t[0]
                      and s[1] < fd[1] < t[1]), reverse=True)
    return (teacher, *(name for _, name in between), student)


def validate_chain(chain: tuple[str, ...], teacher: str, student: str) -> tuple[str, ...]:
    """Checks that a chain runs from ``teacher`` to ``student`` through ever smaller models."""
    text = ":".join(chain)
    if len(chain) < 2 or chain[0] != teacher:
        raise KdbenchError(f"--ta-chain {text} does not start at the teacher {teacher}")
    if chain[-1] != student:
        raise KdbenchError(f"--ta-chain {text} does not end at the student {student} of the pair {teacher}:{student}")
    for bigger, smaller in zip(chain, chain[1:]):
        if parameter_count(smaller) >= parameter_count(bigger):
            raise KdbenchError(f"--ta-chain {text}: {smaller} ({parameter_count(smaller) / 1e6:.3f} M parameters) "
                               f"is not smaller than {bigger} ({parameter_count(bigger) / 1e6:.3f} M) before it")
    return chain
