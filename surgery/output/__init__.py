"""The output folder: written under a hidden staging folder with a journal, then renamed into place;
its record (surgery.json) and model card, made from the recipe in memory; and `verify`."""
