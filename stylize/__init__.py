"""Neural style transfer (Gatys et al.): optimize an image so VGG19 sees the content of one
picture in the style of another. Importable without gradio; the web UI lives in `stylize.ui`."""

from .engine import Progress, transfer
from .images import ImageError, load_image
from .settings import Settings, SettingsError
from .vgg import UntrainedWeightsWarning, WeightsError

__all__ = ["ImageError", "Progress", "Settings", "SettingsError", "UntrainedWeightsWarning", "WeightsError",
           "load_image", "transfer"]
