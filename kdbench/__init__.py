"""kdbench: compare knowledge-distillation methods through one common, measured harness."""

__version__ = "0.1.0"
