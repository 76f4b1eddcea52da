"""ComfyUI's internals, in one place.

What the pack needs from ComfyUI beyond its public surface (the V3 node API `comfy_api`, the model
folders of `folder_paths`, ModelPatcher's methods and model management's loading calls) goes
through this package: ComfyUI's own nodes module, the sampler's cond processing and batching,
the attention precision policy, model types, checkpoint loading, importing ComfyUI as a library.
A ComfyUI release that changes one of these changes this package only; docs/comfyui_compatibility.md
lists each with its state in the hosts the pack is tested on. tests/fast/host/test_structure.py
keeps the rest of the pack out of ComfyUI's internals.
"""
