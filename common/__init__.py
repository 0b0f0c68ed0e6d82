"""What every step needs and no step teaches: schemas, config, model loading, sampling, the API."""
