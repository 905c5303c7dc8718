"""The output folder: written as a partial output (a hidden sibling) with a journal, then renamed into place;
its record (surgery.json) and model card, made from the recipe in memory; and `verify`."""
