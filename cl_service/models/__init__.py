"""Building and loading the MLLM: configs, tokenizer, model, base pre-training, model store."""
