"""Figures for the app: colours, maps, plots. Builds figure objects; never draws UI itself."""
