"""What is built on top of the verbs: the model ``organism`` (a SmolLM2 fine-tuned to refuse) and the
``demo`` that runs the main job on it."""
