"""Model loading (causal LM, vision-language, diffusion) and the builders of the embedded tiny models."""
