"""What the timing benchmarks share: the default student, built from the configs' own defaults."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from hybridopt.config import DistillConfig, TeacherConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # every script's default --out, from any working directory


def default_student_config() -> LlamaConfig:
    """The Llama config `hybridopt distill` gives its student on the embedded default (no teacher needed)."""
    student, teacher = DistillConfig(), TeacherConfig()
    return LlamaConfig(vocab_size=teacher.vocab_size, hidden_size=student.student_hidden,
                       intermediate_size=student.student_intermediate, num_hidden_layers=student.student_layers,
                       num_attention_heads=student.student_heads,
                       num_key_value_heads=student.student_kv_heads or student.student_heads,
                       max_position_embeddings=teacher.context, tie_word_embeddings=student.tie_embeddings)
