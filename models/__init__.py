"""The eager DMF model (installed as ``dmf_export.models``)."""
from .dmf import DMF, AlignmentODE, DeformConv2d, MetaFilterGenerator, check_groups_kernel
from .resnet12 import BasicBlock, ResNet12

__all__ = ["DMF", "AlignmentODE", "BasicBlock", "DeformConv2d", "MetaFilterGenerator",
           "ResNet12", "check_groups_kernel"]
