"""Language-model tasks: our GPT, embedded and local corpora, tokenizers, Hugging Face fine-tuning."""
