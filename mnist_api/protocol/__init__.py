"""The Open Inference Protocol (V2): the pure codec (no Flask) and its request/response schemas."""
