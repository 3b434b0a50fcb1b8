"""`polydecode bench quality`: generation quality against cost for every decoding strategy."""
