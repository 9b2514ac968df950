"""The learner: pure GRPO math, the policy forward pass, and the Ray Train worker loop."""
