"""Training and validation wiring shared by train.py and validate.py."""
