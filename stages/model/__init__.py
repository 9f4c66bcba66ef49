"""The model room: the Qwen2.5-VL wrapper, input builders and the memory-aware temporal compression layer."""
