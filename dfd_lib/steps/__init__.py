"""The method's five steps as library entry points: each step's typed config, and its command where it
has one. A notebook builds its step's config in one call (``FeaturesConfig.from_params(globals())``);
``dfd embed`` (step 01) and ``dfd cluster`` (step 02) take the same settings as options.
:data:`~dfd_lib.steps.step_configs.STEP_CONFIGS` maps each notebook to its config. Above every stage
it composes, below the pipeline that runs the notebooks."""
