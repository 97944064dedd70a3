"""Analysis of what training produced: mirror symmetries as data (symmetries), structure metrics
(metrics), critical weight decay (critical), `symrun check` (check), closed forms (theory),
small batched eigenproblems (linalg) and the report (tables, phase diagrams)."""
