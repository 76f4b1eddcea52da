"""Parallel Visual Attention (PVA) for identity-preserving face inpainting.

The method as a library: face preparation, FaceNet, the identity encoder, the fused parallel
attention, patching of ComfyUI models, the weights format and quick personalization.
"""
