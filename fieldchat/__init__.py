"""The fieldchat command line: composes the sub-commands of each package."""
