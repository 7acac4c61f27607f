"""Serve the style transfer web app: `python app.py` here, or as a Hugging Face Space's entry point."""

from stylize.ui import build_demo, launch_options

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_options())
