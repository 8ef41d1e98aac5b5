"""Turning a step's logits into tokens: penalties, grammar masks, the sampler, and the batch pipeline that runs them
with a row-by-row fallback (`logits.sample_batch`). Used on the engine thread only."""
