"""Building blocks shared by the methods: backbones (ResNet with torchvision names, EfficientNet-Lite0 with
its shipped ImageNet weights), FPN and losses. Import the submodules (``nn.backbones``, ``nn.fpn``,
``nn.losses``); this package stays import-light."""
