__author__ = "Taras Kozlov"
__version__ = "2.3.1+fastfan.4"
