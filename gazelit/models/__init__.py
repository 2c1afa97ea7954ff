"""Model building blocks for gazelit: vision encoders, projectors, LLM loading and tiny test configs."""
