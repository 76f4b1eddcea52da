"""ComfyUI entry point for comfyui-pva (Parallel Visual Attention face inpainting).

Registers the model folders models/pva and models/facenet, and the nodes through ComfyUI's
V3 extension API (comfy_entrypoint), the schema ComfyUI core's own nodes use.
"""

# ComfyUI imports this folder as a package. pytest also imports this file (the repository root
# is a package) and, when the clone's folder name is not a Python identifier, as a plain module
# without a package: then there is nothing to register and relative imports cannot work.
if __package__:
    from comfy_api.latest import ComfyExtension, io

    from .nodes import NODES
    from .nodes.folders import register_model_folders

    register_model_folders()

    class PVAExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> PVAExtension:
        return PVAExtension()
