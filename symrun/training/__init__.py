"""Training a pack: the packed trainer (engine), per-run optimisers (optim), a pack's saved state
(checkpoint), what the optimiser trains versus what the network uses (reparam: DCS, symmetry
removal), and memory (one estimate of a pack's memory: pack sizes, λ_c's passes, and the refusals
before any work)."""
