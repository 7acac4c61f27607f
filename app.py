"""Serve the style transfer web app: `python app.py` here, or as a Hugging Face Space's entry point."""

import logging

from stylize.ui import build_demo, launch_options

logging.basicConfig(format="%(message)s")  # what the app says at start-up goes to the server's log
logging.getLogger("stylize").setLevel(logging.INFO)
demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_options())
