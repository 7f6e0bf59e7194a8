"""The training step: the project's against the textbook QLoRA recipe, its memory, and a CPU trial's step."""
