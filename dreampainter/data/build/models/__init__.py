"""Model-backed components of ``dreampainter data build``, each loaded from local files only.

Each is constructed as ``cls(**options, device=device)`` from its dotted path:

- :class:`.onnx_segmenter.OnnxSalientSegmenter` (``MaskMaker``): U²-Net / IS-Net / BiRefNet ONNX exports.
- :class:`.sam.SamRefiner` (``MaskRefiner``): transformers SAM, prompted by the mask's box.
- :class:`.diffusers_inpaint.DiffusersInpaintReference` and :class:`.lama.LamaReference`
  (``ReferenceMaker``): the dilated product region removed by inpainting.
- :class:`.blip.BlipCaptioner` (``Captioner``) and :class:`.marian.MarianTranslator` (``Translator``).

The modules import their heavy dependencies (onnxruntime, transformers, diffusers) only when used.
"""
