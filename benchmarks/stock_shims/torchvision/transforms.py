"""PIL equivalents of torchvision's Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, Lambda, ToTensor,
Normalize and InterpolationMode (see the package docstring)."""

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    LANCZOS = Image.LANCZOS
    BOX = Image.BOX
    HAMMING = Image.HAMMING


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """The short side to ``size`` (an int), the long side in proportion, as torchvision does for an int size."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.resample = size, interpolation.value

    def __call__(self, image):
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        size = (self.size, new_long) if w <= h else (new_long, self.size)
        return image if (w, h) == size else image.resize(size, self.resample)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        w, h = image.size
        left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, image):
        w, h = image.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __call__(self, image):
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else image


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std
