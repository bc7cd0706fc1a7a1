"""The forward-mode engine: directional derivatives of a loss closure with no backward pass.

``forward_mode`` swaps trained parameters for dual tensors while the closure runs;
``closure_context`` makes every op the closure reaches have a forward-mode rule;
``attention`` is the blocked forward-mode rule for scaled-dot-product attention;
``cross_entropy`` the one for cross-entropy over a large class dimension;
``lm_loss`` computes a causal LM's loss over the vocabulary in blocks of tokens;
``rng_state`` and ``vmap_fallback`` keep K directions' passes on one dropout mask.
"""
