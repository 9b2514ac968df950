"""Records that cross processes, the seams between roles, and the replay buffer."""
