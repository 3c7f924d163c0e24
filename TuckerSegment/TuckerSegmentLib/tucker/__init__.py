"""Tucker-2 factorisation of convolutions: layer descriptions, decomposition, activation statistics, network costs."""
