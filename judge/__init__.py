"""Rewards (accuracy, format, repetition, visual perception) and the Ray Serve judge application."""
