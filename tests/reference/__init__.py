"""Plain-torch references of the seed architectures torchvision lacks, written
from the seeds' descriptions (``/work/shared/seeds``), with the builders'
module names so that a builder's state dict loads strictly into them. They
import nothing from convkernels."""
