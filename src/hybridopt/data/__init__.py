"""Data: corpora as documents (`corpus`), document-level train/validation splits (`splits`), token streams cut
into training blocks (`blocks`), resumable batch samplers (`sampler`), k-means data clusters on teacher features
(`clusters`), and the teacher-logit cache for offline distillation (`teacher_cache`).

May import: the core modules and models (a teacher's hash and vocabulary).
"""
