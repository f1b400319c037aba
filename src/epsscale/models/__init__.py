"""Networks: our ADM UNet that loads guided-diffusion checkpoints, and the small demo nets."""

from epsscale.models.adm import ADMUNet, create_adm_model, load_adm_state_dict

__all__ = ["ADMUNet", "create_adm_model", "load_adm_state_dict"]
