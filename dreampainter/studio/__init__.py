"""DreamPainter Studio: a local web page (Gradio) over one loaded pipeline.

``service`` does the work without a browser (uploads, masks, placement, generation, settings);
``app`` builds the page on it and needs the optional ``gradio`` dependency
(``pip install 'dreampainter[studio]'``). Importing this package does not import gradio; it switches
gradio's usage analytics off (unless the environment says otherwise) before anything imports it.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
