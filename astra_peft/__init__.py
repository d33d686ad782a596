"""Astra: Activation-Space Tail-Eigenvector Low-Rank Adaptation, on top of Hugging Face PEFT."""
