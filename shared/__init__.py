"""Pieces the encode service and the training job share: shard schema, device, audio, qwen_tts adapter."""
