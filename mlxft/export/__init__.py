"""`mlxft export`: take a run where people run models (GGUF for llama.cpp and Ollama, LM Studio, mlx-lm),
each file verified against base + adapter before it is kept."""
