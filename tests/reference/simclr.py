"""SimCLR's model (Chen et al. 2020): z = g(f(x)), f the encoder with its
classifier removed (h after average pooling), g = W2 ReLU(W1 h)."""
from torch import nn


class SimCLR(nn.Module):
    def __init__(self, encoder, feature_dim, projection_dim=128):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                       nn.Linear(feature_dim, projection_dim))

    def forward(self, x):
        return self.projector(self.encoder(x))
