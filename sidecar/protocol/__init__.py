"""What both ends of the control socket share (the daemon and the preload inside trainers)."""
