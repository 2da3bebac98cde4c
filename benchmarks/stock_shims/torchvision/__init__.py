"""A stand-in for the few ``torchvision.transforms`` that diffusers' ``train_text_to_image.py`` uses, written on PIL
and torch, for ``benchmarks/bench_training_stock.py`` only: torchvision's PyPI wheels replace (and break) the CPU torch
this project pins, so the stock script runs here with these PIL equivalents (what torchvision itself does for PIL
images: bilinear/bicubic ``Image.resize`` on the short side, centre or random crop, flip, to [0, 1], normalise)."""
