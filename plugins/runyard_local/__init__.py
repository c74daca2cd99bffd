"""runyard's built-in local plugins, registered through the public plugin API like any other."""
