"""What is trained: the talker's training forward on the inference layout, LoRA, FSDP2."""
