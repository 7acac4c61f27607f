import os

# Tests never touch the network: the engine runs on untrained VGG19 features
# unless a test builds its own weights file.
os.environ["STYLIZE_WEIGHTS"] = "untrained"
