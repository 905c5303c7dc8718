"""Surgery's own storage formats (compact recursive, ensemble, packed quantized) and how to open any checkpoint."""
