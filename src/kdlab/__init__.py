"""kdlab: controlled language-model distillation experiments and teacher-hacking detection."""

__version__ = "0.1.0"
